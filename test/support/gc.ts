/**
 * A full garbage collection, for tests that check what stays reachable (WeakRef): V8's `gc`,
 * exposed at run time rather than by a node flag on the test runner.
 */
import v8 from "node:v8"
import vm from "node:vm"

v8.setFlagsFromString("--expose-gc")

export const gc = vm.runInNewContext("gc") as () => void
