"""XLA compile options for tests that compare two programs compiled alike."""

# Tiny programs, each run a few times: XLA's compile time dominates, so compile without LLVM's
# expensive passes (about halves it). Both sides of a comparison must use the same options: the
# float rounding, not the numerics under test, can differ from a default compile.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
