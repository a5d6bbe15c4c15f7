def dose_features(doses: np.ndarray, max_dose: float, encoding: str) -> np.ndarray:
    """{dose_encoding}: x = log1p(dose)/log1p(max training dose); log_hill adds the saturating x/(0.5+x)
    and x² so a linear map can follow a Hill-shaped response; log_mlp leaves the shape to the network."""
    x = np.log1p(np.nan_to_num(doses, nan=0.0)) / np.log1p(max(max_dose, 1e-6))
    if encoding == "log_hill":
        return np.stack([x, x / (0.5 + x), x * x], axis=1)
    return x[:, None]
