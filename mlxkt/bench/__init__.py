"""`mlxkt bench`: mlxkt against mlx-lm on the same weights (synthetic real-width DeepSeek-V3
slices or any converted model). cli.bench_command is the light entry point; runner does the
work; synth builds the models; measure/breakdown time things; variants are experiments."""
