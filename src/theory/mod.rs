//! The theory engine (THEORY.md §5): the paper's closed forms, the exact discrete ledger and
//! equilibrium predictions, float64, O(groups) state.
