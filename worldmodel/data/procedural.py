"""The embedded default data: procedural images, videos and audio (deterministic, no download).

Each dataset is map-style, deterministic in (seed, index), and exposes ``label_names``,
``num_classes`` (categorical labels only) and ``class_names`` for the representation probes.
"""

from worldmodel.data.procedural_audio import ProceduralAudio, audio_caption
from worldmodel.data.procedural_images import ProceduralImages, image_caption
from worldmodel.data.procedural_video import ProceduralVideos, video_caption

__all__ = ["ProceduralAudio", "ProceduralImages", "ProceduralVideos", "audio_caption", "image_caption",
           "video_caption"]
