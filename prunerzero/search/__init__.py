"""The GP search: DEAP loop, OOS with SymPy, config, checkpoints, export."""
