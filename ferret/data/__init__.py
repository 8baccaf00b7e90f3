"""Training and evaluation data.

    grit.py             GRIT-format json: validation, mixing (data multiples), seeded rendering
                        of point/box/free-form regions, GritDataset
    collate.py          FerretCollator (right padding, stacked images, region masks per sample)
    formats.py          LLaVA conversations, RefCOCO-family and Flickr30k-Entities readers
    points.py           point-prompt sampling strategies
    rle.py              COCO RLE masks through pycocotools
    errors.py           DataFormatError, SampleError (skip reasons), read_json
    synthetic.py        the synthetic GRIT world (python -m ferret.data.synthetic)
    synthetic_tokenizer.py  the synthetic world's small LLaMA-like BPE, trained in-process
    build_tokenizer.py  trains it on the synthetic corpus (python -m ferret.data.build_tokenizer)
    throughput.py       loader throughput (python -m ferret.data.throughput)

Kept import-free so the command-line modules start fast.
"""
