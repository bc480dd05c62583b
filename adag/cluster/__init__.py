"""Clustering: multi-view similarity of attribution profiles, spectral clustering, cluster graph."""

import lazy_loader

# Lazy: the CLI imports cluster.config at start-up without paying for scikit-learn.
__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "config": ["ClusterConfig"],
    "methods": ["METHODS", "ProfileClustering"],
    "profiles": ["HalfNeuronProfiles", "half_neuron_profiles"],
    "run": ["cluster_run"],
    "similarity": ["combine_views", "knn_similarity", "similarity"],
})
