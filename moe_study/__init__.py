"""The library of the dense-vs-MoE study: stages/ call it, it calls kernels/ (README "Layout")."""
