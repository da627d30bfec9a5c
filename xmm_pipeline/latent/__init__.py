"""What the latent space is used for: embeddings, nearest-neighbour search, outliers, trajectories,
clusters, maps, class cross-matches and the evaluation report. Plain functions, no Dagster."""
