"""The theory engine (THEORY.md §5) on numpy arrays: closed forms, exact ledger, equilibrium."""
