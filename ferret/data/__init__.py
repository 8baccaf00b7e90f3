"""Training and evaluation data.

    grit.py             GRIT-format json: validation, mixing (data multiples), seeded rendering
                        of point/box/free-form regions, GritDataset
    collate.py          FerretCollator (right padding, stacked images, region masks per sample)
    formats.py          LLaVA conversations, RefCOCO-family and Flickr30k-Entities readers
    points.py           point-prompt sampling strategies
    rle.py              COCO RLE masks through pycocotools
    errors.py           DataFormatError, SampleError (skip reasons), read_json
    synthetic.py        the synthetic GRIT world (python -m ferret.data.synthetic)
    build_tokenizer.py  the small BPE tokenizer (python -m ferret.data.build_tokenizer)
    throughput.py       loader throughput (python -m ferret.data.throughput)

Kept import-free so the command-line modules start fast.
"""
