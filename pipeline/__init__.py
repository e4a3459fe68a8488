"""transkd-deploy: distil a compact SegFormer student with TransKD and export it for deployment."""
