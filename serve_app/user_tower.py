"""Old home of the user tower's feature helpers, kept for training (training/system.py and
training/simulate.py import `feature_shapes` from here); the host lives in
serve_app/deployments/user_tower.py."""

from serve_app.deployments.user_tower import feature_shapes

__all__ = ["feature_shapes"]
