//! Keys as WireGuard tools show them: 32 bytes in standard base64 (44 characters).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("a key is 32 bytes in base64 (44 characters), got {0:?}")]
    Malformed(String),
}

pub fn encode(key: &[u8; 32]) -> String {
    STANDARD.encode(key)
}

pub fn decode(text: &str) -> Result<[u8; 32], KeyError> {
    let t = text.trim();
    STANDARD
        .decode(t)
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .ok_or_else(|| KeyError::Malformed(t.chars().take(60).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_bad_ones_are_refused() {
        let k = [7u8; 32];
        let s = encode(&k);
        assert_eq!(s.len(), 44);
        assert_eq!(decode(&s).unwrap(), k);
        assert!(decode("abc").is_err());
        assert!(decode(&encode(&[1; 32])[..40]).is_err());
    }
}
