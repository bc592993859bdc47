"""The online graph's stages as pure functions over batches, one module per deployment (its twin).

`records` holds what travels between stages; `catalog` the item tables and manifest terms several
stages share; `user_tower`, `retriever`, `ranker`, `reranker` each load only their own artifacts
(`from_bundle`, `from_directory`) and take and return a batch. No Ray, Redis or Feast here.
"""
