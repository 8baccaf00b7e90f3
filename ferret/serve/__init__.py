"""Serving: controller + model workers + gradio demo, a CLI and an OpenAI-compatible API.

    python -m ferret.serve.controller --host 127.0.0.1 --port 21001
    python -m ferret.serve.model_worker --controller http://127.0.0.1:21001 --port 21002 \
        --worker http://127.0.0.1:21002 --model-path PATH [--load-4bit | --load-8bit] --add_region_feature
    python -m ferret.serve.gradio_web_server --controller http://127.0.0.1:21001 --model-list-mode reload
    python -m ferret.serve.demo [--model-path PATH] [--load-4bit | --load-8bit] [--port 7860]   # all three
    python -m ferret.serve.cli --image IMG [--box x1,y1,x2,y2 | --point x,y | --mask M.png] "question"

Modules: ``protocol`` (wire format, request checks), ``engine`` (FerretChat behind a worker),
``controller``, ``model_worker``, ``openai_api``, ``auth`` (API key), ``client`` (controller
client), ``drawing`` (strokes -> regions, boxes on images), ``gradio_web_server``, ``demo``, ``cli``.
Every server binds to 127.0.0.1 unless told otherwise.
"""
