"""The pipeline's last steps: compare every stage's artifact (report) and run one on cases (predict)."""
