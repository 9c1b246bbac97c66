/**
 * The live sequences of a GPU runner's DecodeSlots, shared by the DecodeSlot entities (which
 * run them) and the GpuScheduler entities (FindTurn).
 */
import { Context, Layer } from "effect"
import type { TurnStreamId } from "../../runtime/TurnStream.js"
import type { StartRequest } from "../DecodeSlot.js"

/** A live sequence of one of this runner's slots. */
export interface RunningSlot {
  readonly turnId: string
  readonly request: StartRequest
  /** Stops it. @returns whether it was still running. */
  readonly cancel: () => boolean
  /**
   * Stops it without ending its turn (no report, no terminal event): the turn moved to another
   * slot (failover), which goes on with it. @returns whether it was still running.
   */
  readonly abandon: () => boolean
  /**
   * Moves its output to stream `streamId` (a reader resuming after token event `afterIndex`):
   * the events it wrote after that index go there first. @returns false when it cannot (it
   * ended, or the reader wants events from before this slot took the turn over).
   */
  readonly attach: (streamId: TurnStreamId, afterIndex: number) => boolean
}

/**
 * The live sequences of this runner's DecodeSlots, by slot id. They live in this runner's
 * engines, so a shard move (the runner is gone) has nothing of them to carry; GpuScheduler's
 * FindTurn reads it too.
 */
export class RunningSlots extends Context.Tag("chat/RunningSlots")<RunningSlots, Map<string, RunningSlot>>() {
  static readonly layer = Layer.sync(RunningSlots, () => new Map<string, RunningSlot>())
}

