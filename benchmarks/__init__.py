"""clipzsl's benchmarks: data fetched from package registries, results in benchmarks/results/."""
