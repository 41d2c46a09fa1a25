"""The build side: recipe to artifact. Recipes, pipeline sources and the built-in pipelines, transforms, example
inputs, export, AOTInductor, regional capture, the build itself and rebind."""
