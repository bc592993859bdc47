"""Feast feature repository of recserve: entities, sources, views and the feature services models read.

Definitions live in `entities`, `sources`, `views` and `services` (Feast objects, the `feast init` idiom);
`config` is the profile chosen by settings and `store` builds a `FeatureStore` from it (apply, materialize).
Nothing here imports `serve_app` or `training`: both import this package.
"""
