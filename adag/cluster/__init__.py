"""Clustering: multi-view similarity of attribution profiles, spectral clustering, cluster graph."""

from adag.cluster.methods import METHODS, ProfileClustering
from adag.cluster.profiles import HalfNeuronProfiles, half_neuron_keys, half_neuron_profiles
from adag.cluster.run import ClusterConfig, cluster_run, node_clusters
from adag.cluster.similarity import combine_views, knn_similarity, similarity

__all__ = ["METHODS", "ClusterConfig", "HalfNeuronProfiles", "ProfileClustering", "cluster_run", "combine_views",
           "half_neuron_keys", "half_neuron_profiles", "knn_similarity", "node_clusters", "similarity"]
