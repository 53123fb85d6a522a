"""Tools apart from the library: they import it, it never imports them. Each runs from anywhere
as `python tools/<name>.py ...` (it puts the repository root on sys.path itself):

    prepare.py       setup (BPE vocabulary, WordNet synonyms), make-demo, modelzoo-dataset
    compare_demo.py  DeCLIP against CLIP on the demo corpus, over seeds
    imagenet_val.py  the evaluation meta of ImageNet's validation images
    bench.py         speed and memory benchmarks
"""
import os


def write_atomic(path, payload):
    """`payload` (bytes) to `path` through a temporary file beside it: a reader never sees half a file."""
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_bytes(payload)
    os.replace(tmp, path)
