"""The teacher recipe: RefineFormer3D from the config, supervised Dice + (B)CE, through the engine."""
