"""Constants shared by the whole package (token strings, ids, geometry)."""

IMAGE_TOKEN = "<image>"
REGION_TOKEN = "<region_fea>"
# Placeholder id put into input_ids where the image embeddings go (LLaVA/Ferret convention).
IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100

# Region coordinates in prompts live on a 0..GRID_SIZE-1 grid (Ferret: 0-999).
GRID_SIZE = 1000

# CLIP ViT-L/14-336 image statistics.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
