/** Messages between GpuWorkerThread (main thread) and gpuWorkerThreadEntry (its worker thread). */
import type { InfoReply } from "../EngineProtocol.js"
import type { GenerateRequest, StepRecord, StepStats } from "../GpuWorker.js"
import type { FinishReason } from "../SchedulerCore.js"

/** A sequence is named by the main thread's ticket, not the worker's seq id. */
export type ToWorker =
  | { readonly t: "start"; readonly ticket: number; readonly request: GenerateRequest }
  | { readonly t: "pause" | "resume" | "cancel"; readonly ticket: number }
  | { readonly t: "stats" | "info"; readonly id: number }
  | { readonly t: "close" }

export type FromWorker =
  | { readonly t: "ready"; readonly info: InfoReply; readonly maxModelLen: number }
  | { readonly t: "error"; readonly code: string; readonly message: string }
  /**
   * One step's worth of output. `data`: (ticket, token id, finish code) triples; `failed`:
   * (ticket, error code, message); `steps`: StepRecords since the last message.
   */
  | {
    readonly t: "out"
    readonly data: Int32Array
    readonly failed: ReadonlyArray<readonly [number, string, string]>
    readonly steps: ReadonlyArray<StepRecord>
  }
  | { readonly t: "reply"; readonly id: number; readonly value: StepStats | InfoReply }
  | { readonly t: "replyError"; readonly id: number; readonly code: string; readonly message: string }

export const FINISH_CODE: Readonly<Record<FinishReason, number>> = { stop: 1, length: 2 }
export const FINISH_REASON: ReadonlyArray<FinishReason | undefined> = [undefined, "stop", "length"]
