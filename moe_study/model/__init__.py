"""The decoder LM: layers, router and balancing losses, the MoE block, the LM with save/load."""
