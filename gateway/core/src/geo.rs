//! Great-circle distance: the one definition of "nearest" used by the edge (and later GeoDNS).

const EARTH_RADIUS_KM: f64 = 6371.0088;

/// Haversine distance in kilometres between two (lat, lon) points in degrees.
pub fn distance_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (lat1, lon1) = (a.0.to_radians(), a.1.to_radians());
    let (lat2, lon2) = (b.0.to_radians(), b.1.to_radians());
    let dlat = lat2 - lat1;
    let dlon = lon2 - lon1;
    let h = (dlat / 2.0).sin().powi(2) + lat1.cos() * lat2.cos() * (dlon / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * h.sqrt().min(1.0).asin()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::approx_constant)] // 3.14 is Kuala Lumpur's latitude
    fn known_distances() {
        assert!(distance_km((1.35, 103.82), (1.35, 103.82)) < 1e-9);
        // Singapore - Kuala Lumpur is about 316 km; Seoul - Tokyo about 1160 km.
        let sg_kl = distance_km((1.35, 103.82), (3.14, 101.69));
        assert!((300.0..330.0).contains(&sg_kl), "{sg_kl}");
        let seoul_tokyo = distance_km((37.57, 126.98), (35.68, 139.69));
        assert!((1100.0..1200.0).contains(&seoul_tokyo), "{seoul_tokyo}");
        // Antipodes: half the circumference.
        let half = distance_km((0.0, 0.0), (0.0, 180.0));
        assert!((half - std::f64::consts::PI * EARTH_RADIUS_KM).abs() < 1.0);
    }
}
