"""d4c benchmarks (`make bench`): results are written as tables under bench/out/."""
