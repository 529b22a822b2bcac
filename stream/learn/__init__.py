"""The learner: sample batches, delayed feedback, evaluation, the feed and the trainer process."""
