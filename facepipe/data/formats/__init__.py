"""File formats read and written byte-exactly: MXNet RecordIO (+ .idx), InsightFace's dataset
layout, verification `.bin`, landmark files, and image headers (type and size before any decoding).
"""
