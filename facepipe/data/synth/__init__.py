"""`facepipe synth`: the generated sample dataset (identities, degradation, pair sets, protocols).

`generate` is the entry; `spec` the parameters, `identity`/`draw`/`render`/`features` the images,
`samples`/`tables`/`protocols` the pair sets and protocol layouts, `baselines` the pixel/HOG baselines.
"""
