"""Pictures of a run, written into its directory: training curves, the routing masks, sample
grids a person can read, and metric curves (with seed bands when comparing runs)."""
