"""Identity headers and the privacy constraints P1, P2."""
from losses.headers import HEADERS, ArcFace, CosFace, ElasticArcFace, ElasticCosFace, Header, get_header, \
    register_header
from losses.privacy import PrivacyTerms, gender_weight_centroids, privacy_terms

__all__ = ["HEADERS", "Header", "register_header", "ArcFace", "CosFace", "ElasticArcFace", "ElasticCosFace",
           "get_header", "PrivacyTerms", "gender_weight_centroids", "privacy_terms"]
