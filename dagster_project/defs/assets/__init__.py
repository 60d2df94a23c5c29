"""Assets, one module a pipeline stage (data, images, models, evaluation); discovered automatically."""
