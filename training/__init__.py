"""Dataset generation and loading, training and evaluation of the PBNDS networks."""
