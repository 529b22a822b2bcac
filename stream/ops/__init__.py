"""Operations: the one settings object, clocks, metrics, Prometheus and the model store."""
