"""Tests of the latent-map explorer and the latent queries it shares with the CLI."""
