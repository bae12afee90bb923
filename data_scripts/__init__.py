"""Download, verify and shard the real datasets (COCO captions, Flickr30k, CC3M, Visual Genome,
VQA v2) into webdataset shards that ``course_lib.data.shards.ShardDataset`` streams.

Run from the repository root, e.g. ``python -m data_scripts.download --list``; see README.md.
"""
