"""Grad-CAM explanations: class-activation heatmaps of a classifier, drawn on the original images.

One module a job: :mod:`~skinlesion.gradcam.maps` computes the heatmaps at the model's input and maps
them back onto the original image; :mod:`~skinlesion.gradcam.explanation` holds one explained image and
its table row; :mod:`~skinlesion.gradcam.figures` draws an explanation or a class's gallery page;
:mod:`~skinlesion.gradcam.gallery` picks the examples of a split and writes its galleries (also at the
end of training). ``python -m skinlesion.explain`` is the command over them.
"""
