"""fed-swinumamba: federated Swin-UMamba segmentation across hospitals."""
