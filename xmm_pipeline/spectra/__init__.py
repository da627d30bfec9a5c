"""From pipeline products to the training set: responses, binning, unfolding, Parquet."""
