"""Evaluation: the paper's benchmarks with their released protocols.

Each task runs as `python -m ferret.eval.<task> --model-path PATH --data ... --images ... --out DIR`:
refcoco (RefCOCO/+/g Acc@0.5), flickr (Flickr30k Entities recall@k), lvis (referring object
classification with points and boxes), pope (object hallucination), ferret_bench (judged
referring/grounding answers), and synthetic_report (all four box/yes-no tasks on the synthetic
world). Shared machinery lives in `common`, metric functions in `metrics`, judges in `judge`.
"""
