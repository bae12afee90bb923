"""ipywidgets explorers used by the notebooks. They also work in plain Python: setting a control's
``.value`` redraws, and each explorer's ``readout.value`` (HTML) and ``figure`` can be read back,
which is how the tests drive them.

- ``scene_browser(world)``: a ShapeWorld scene with its boxes and every annotation (notebook 00);
- ``retrieval_playground(model, tokenizer, images, captions)``: caption -> images and image ->
  captions with a two-tower model (notebook 00);
- ``attention_explorer(maps, image, tokens, grid=... | boxes=...)``: one query token's attention over
  the image and the text, for every fusion style (notebook 04);
- ``masked_word_playground(predict, tokenizer, caption, images)``: an MLM model's guesses for a hidden
  word given the caption's image and another one (notebook 05);
- ``transport_explorer(words, regions, tokens, image, boxes)``: a word's transport mass among the
  regions, and the whole IPOT plan (notebook 07).

Each is built on ``base.Explorer``: controls, an ``Output`` redrawing one figure, an HTML readout.
"""

from course_lib.widgets.attention import attention_explorer, text_query_attention
from course_lib.widgets.base import Explorer, InputProblem
from course_lib.widgets.masked_word import masked_word_playground
from course_lib.widgets.retrieval import caption_problem, retrieval_playground
from course_lib.widgets.scene import describe_scene, scene_browser
from course_lib.widgets.transport import transport_explorer

__all__ = ["Explorer", "InputProblem", "attention_explorer", "caption_problem", "describe_scene",
           "masked_word_playground", "retrieval_playground", "scene_browser", "text_query_attention",
           "transport_explorer"]
