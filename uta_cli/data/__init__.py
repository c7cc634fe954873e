"""Data: sources, datasets and transforms, turned into batches.

pipeline (sources, per-rank sampling, masks in the collate), folders (image folders and what the
readers share), shards (webdataset tar shards), shard_resume (resuming a tar stream mid-epoch
without decoding what came before), shard_writer (a source's samples listed and written as
shards; the manifest of `uta shards` read back), decode (JPEG decoding and crops on the device),
transforms (views and transforms), captions (caption files), demo (the generated demo images,
captions and classes).

May import models, masks and the ground floor.
"""
