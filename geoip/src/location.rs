use std::fmt;

/// An ISO 3166-1 alpha-2 country code held inline, so a lookup on the request path allocates nothing.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CountryCode([u8; 2]);

impl CountryCode {
    /// Parses a two-letter code, case-insensitively. Anything else is `None`.
    pub fn parse(code: &str) -> Option<Self> {
        match code.as_bytes() {
            [a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => {
                Some(Self([a.to_ascii_uppercase(), b.to_ascii_uppercase()]))
            }
            _ => None,
        }
    }

    pub fn as_str(&self) -> &str {
        // Both bytes are ASCII letters by construction.
        std::str::from_utf8(&self.0).unwrap_or("??")
    }
}

impl fmt::Display for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a client is, as far as the database knows.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Location {
    pub country: Option<CountryCode>,
    pub continent: Option<CountryCode>,
    /// (latitude, longitude) in degrees, when the database has coordinates.
    pub coordinates: Option<(f64, f64)>,
}

impl Location {
    pub fn is_known(&self) -> bool {
        self.country.is_some() || self.coordinates.is_some()
    }
}
