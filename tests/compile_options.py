"""XLA compile options of the in-process tests (conftest.py) and of tests that compare two
programs compiled alike (passed explicitly there, so they hold with NATGRAD_TEST_FULL_COMPILE=1)."""

# Tiny programs, each run a few times: XLA's compile time dominates, so compile without LLVM's
# expensive passes (about halves it). Both sides of a comparison must use the same options: the
# float rounding, not the numerics under test, can differ from a default compile.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
