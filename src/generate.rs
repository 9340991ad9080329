//! Writes a realistic large bundle, deterministic from a seed (benchmarks and load tests).
