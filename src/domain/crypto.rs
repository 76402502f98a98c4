//! WeChat push signatures and safe-mode (AES) encryption (docs/wechat-api.md §4–5).
//!
//! - `signature` = sha1 of the sorted (token, timestamp, nonce), lowercase hex;
//! - `msg_signature` = the same over (token, timestamp, nonce, Encrypt);
//! - Encrypt = base64(AES-256-CBC(random16 ‖ len_be32 ‖ msg ‖ appid)), key = base64(EncodingAESKey
//!   + "="), IV = key[..16], PKCS#7 padding to a 32-byte block (WeChat's K = 32, not AES's 16).

use aes::Aes256;
use base64::{Engine, engine::general_purpose::STANDARD};
use cbc::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit, block_padding::NoPadding};
use sha1::{Digest, Sha1};
use subtle_eq::constant_time_eq;

const PAD_BLOCK: usize = 32;

/// Why a push could not be verified or decrypted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("EncodingAESKey must be 43 characters of base64 (letters and digits), as the WeChat console shows it")]
    BadKey,
    #[error("Encrypt is not valid base64")]
    NotBase64,
    #[error("Encrypt is not a whole number of AES blocks")]
    BadLength,
    #[error("decrypted text has invalid padding (wrong EncodingAESKey?)")]
    BadPadding,
    #[error("decrypted text is too short or its length field is wrong (wrong EncodingAESKey?)")]
    BadLayout,
    #[error("decrypted message belongs to appid {found:?}, not {expected:?}")]
    WrongAppid { expected: String, found: String },
}

/// `signature` of a push or of the server-verification GET.
pub fn signature(token: &str, timestamp: &str, nonce: &str) -> String {
    sorted_sha1(&mut [token, timestamp, nonce])
}

/// `msg_signature` of a safe-mode push (and of an encrypted reply).
pub fn msg_signature(token: &str, timestamp: &str, nonce: &str, encrypt: &str) -> String {
    sorted_sha1(&mut [token, timestamp, nonce, encrypt])
}

/// Compares a received signature with the expected one without leaking where they differ.
pub fn signature_matches(expected: &str, received: &str) -> bool {
    constant_time_eq(expected.as_bytes(), received.to_ascii_lowercase().as_bytes())
}

fn sorted_sha1(parts: &mut [&str]) -> String {
    parts.sort_unstable();
    let mut h = Sha1::new();
    for p in parts.iter() {
        h.update(p.as_bytes());
    }
    hex::encode(h.finalize())
}

/// The plaintext of a safe-mode message and the appid it was addressed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decrypted {
    pub msg: Vec<u8>,
    pub appid: String,
}

/// An account's AES key, ready to encrypt and decrypt.
#[derive(Clone)]
pub struct Cipher {
    key: [u8; 32],
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cipher([REDACTED])")
    }
}

impl Cipher {
    pub fn new(encoding_aes_key: &str) -> Result<Cipher, CryptoError> {
        if encoding_aes_key.len() != 43 || !encoding_aes_key.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(CryptoError::BadKey);
        }
        // The 43rd character carries 2 spare bits that strict decoders reject; WeChat ignores them.
        let engine = base64::engine::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
        );
        let bytes = engine.decode(format!("{encoding_aes_key}=")).map_err(|_| CryptoError::BadKey)?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| CryptoError::BadKey)?;
        Ok(Cipher { key })
    }

    fn iv(&self) -> [u8; 16] {
        let mut iv = [0u8; 16];
        iv.copy_from_slice(&self.key[..16]);
        iv
    }

    /// Encrypts `msg` for `appid` with the given 16 random bytes; returns the base64 `Encrypt`.
    pub fn encrypt(&self, random16: &[u8; 16], msg: &[u8], appid: &str) -> String {
        let mut plain = Vec::with_capacity(20 + msg.len() + appid.len() + PAD_BLOCK);
        plain.extend_from_slice(random16);
        plain.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        plain.extend_from_slice(msg);
        plain.extend_from_slice(appid.as_bytes());
        let pad = PAD_BLOCK - plain.len() % PAD_BLOCK;
        plain.resize(plain.len() + pad, pad as u8);
        let len = plain.len();
        let enc = cbc::Encryptor::<Aes256>::new(&self.key.into(), &self.iv().into());
        // The buffer is padded to a multiple of the block size above, so this cannot fail.
        let out = enc.encrypt_padded_mut::<NoPadding>(&mut plain, len).map(<[u8]>::to_vec).unwrap_or_default();
        STANDARD.encode(out)
    }

    /// Decrypts a base64 `Encrypt` and splits off the trailing appid.
    pub fn decrypt(&self, encrypt_b64: &str) -> Result<Decrypted, CryptoError> {
        let mut buf = STANDARD.decode(encrypt_b64.trim()).map_err(|_| CryptoError::NotBase64)?;
        if buf.is_empty() || buf.len() % 16 != 0 {
            return Err(CryptoError::BadLength);
        }
        let dec = cbc::Decryptor::<Aes256>::new(&self.key.into(), &self.iv().into());
        let plain = dec.decrypt_padded_mut::<NoPadding>(&mut buf).map_err(|_| CryptoError::BadLength)?;
        let pad = *plain.last().ok_or(CryptoError::BadPadding)? as usize;
        if pad == 0
            || pad > PAD_BLOCK
            || pad > plain.len()
            || plain[plain.len() - pad..].iter().any(|&b| b as usize != pad)
        {
            return Err(CryptoError::BadPadding);
        }
        let content = &plain[..plain.len() - pad];
        if content.len() < 20 {
            return Err(CryptoError::BadLayout);
        }
        let msg_len = u32::from_be_bytes([content[16], content[17], content[18], content[19]]) as usize;
        let rest = &content[20..];
        if msg_len > rest.len() {
            return Err(CryptoError::BadLayout);
        }
        let (msg, appid) = rest.split_at(msg_len);
        let appid = String::from_utf8(appid.to_vec()).map_err(|_| CryptoError::BadLayout)?;
        Ok(Decrypted { msg: msg.to_vec(), appid })
    }

    /// Decrypts and checks that the message was addressed to `appid`.
    pub fn decrypt_for(&self, encrypt_b64: &str, appid: &str) -> Result<Vec<u8>, CryptoError> {
        let d = self.decrypt(encrypt_b64)?;
        if d.appid != appid {
            return Err(CryptoError::WrongAppid { expected: appid.to_owned(), found: d.appid });
        }
        Ok(d.msg)
    }
}

/// Constant-time equality, kept local rather than pulling a crate for ten lines.
mod subtle_eq {
    pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
        if a.len() != b.len() {
            return false;
        }
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_signature_examples() {
        // Server verification GET (Token AAAAA).
        assert_eq!(signature("AAAAA", "1714036504", "1514711492"), "f464b24fc39322e44b38aa78f5edd27bd1441696");
        // Plaintext POST.
        assert_eq!(signature("AAAAA", "1714037059", "486452656"), "899cf89e464efb63f54ddac96b0a0a235f53aa78");
        assert_eq!(signature("spamtest", "1409735669", "1320562132"), "16120ec1b8dbb870f510d87ce6bc2463eae6ca1a");
        assert_eq!(signature("789", "456", "123"), "f7c3bc1d808e04732adf679965ccc34ca7ae3441");
        assert!(signature_matches(
            "f7c3bc1d808e04732adf679965ccc34ca7ae3441",
            "F7C3BC1D808E04732ADF679965CCC34CA7AE3441"
        ));
        assert!(!signature_matches(
            "f7c3bc1d808e04732adf679965ccc34ca7ae3441",
            "f7c3bc1d808e04732adf679965ccc34ca7ae3440"
        ));
        assert!(!signature_matches("f7", "f7c3"));
    }

    const VECTOR_A_ENCRYPT: &str = "+qdx1OKCy+5JPCBFWw70tm0fJGb2Jmeia4FCB7kao+/Q5c/ohsOzQHi8khUOb05JCpj0JB4RvQMkUyus8TPxLKJGQqcvZqzDpVzazhZv6JsXUnnR8XGT740XgXZUXQ7vJVnAG+tE8NUd4yFyjPy7GgiaviNrlCTj+l5kdfMuFUPpRSrfMZuMcp3Fn2Pede2IuQrKEYwKSqFIZoNqJ4M8EajAsjLY2km32IIjdf8YL/P50F7mStwntrA2cPDrM1kb6mOcfBgRtWygb3VIYnSeOBrebufAlr7F9mFUPAJGj04=";

    #[test]
    fn vector_a_official_guide() {
        let c = Cipher::new(&"A".repeat(43)).unwrap();
        assert_eq!(
            msg_signature("AAAAA", "1714112445", "415670741", VECTOR_A_ENCRYPT),
            "046e02f8204d34f8ba5fa3b1db94908f3df2e9b3"
        );
        let d = c.decrypt(VECTOR_A_ENCRYPT).unwrap();
        assert_eq!(d.appid, "wxba5fad812f8e6fb9");
        assert_eq!(
            String::from_utf8(d.msg).unwrap(),
            r#"{"ToUserName":"gh_97417a04a28d","FromUserName":"o9AgO5Kd5ggOC-bXrbNODIiE3bGY","CreateTime":1714112445,"MsgType":"event","Event":"debug_demo","debug_str":"hello world"}"#
        );
        let reply = c.encrypt(b"707722b803182950", br#"{"demo_resp":"good luck"}"#, "wxba5fad812f8e6fb9");
        assert_eq!(reply, "ELGduP2YcVatjqIS+eZbp80MNLoAUWvzzyJxgGzxZO/5sAvd070Bs6qrLARC9nVHm48Y4hyRbtzve1L32tmxSQ==");
        assert_eq!(
            msg_signature("AAAAA", "1713424427", "415670741", &reply),
            "1b9339964ed2e271e7c7b6ff2b0ef902fc94dea1"
        );
        assert!(matches!(c.decrypt_for(VECTOR_A_ENCRYPT, "wxother"), Err(CryptoError::WrongAppid { .. })));
    }

    #[test]
    fn vector_b_official_wxbizmsgcrypt_sample() {
        let encrypt = "hyzAe4OzmOMbd6TvGdIOO6uBmdJoD0Fk53REIHvxYtJlE2B655HuD0m8KUePWB3+LrPXo87wzQ1QLvbeUgmBM4x6F8PGHQHFVAFmOD2LdJF9FrXpbUAh0B5GIItb52sn896wVsMSHGuPE328HnRGBcrS7C41IzDWyWNlZkyyXwon8T332jisa+h6tEDYsVticbSnyU8dKOIbgU6ux5VTjg3yt+WGzjlpKn6NPhRjpA912xMezR4kw6KWwMrCVKSVCZciVGCgavjIQ6X8tCOp3yZbGpy0VxpAe+77TszTfRd5RJSVO/HTnifJpXgCSUdUue1v6h0EIBYYI1BD1DlD+C0CR8e6OewpusjZ4uBl9FyJvnhvQl+q5rv1ixrcpCumEPo5MJSgM9ehVsNPfUM669WuMyVWQLCzpu9GhglF2PE=";
        assert_eq!(
            msg_signature("spamtest", "1409735669", "1320562132", encrypt),
            "5d197aaffba7e9b25a30732f161a50dee96bd5fa"
        );
        let c = Cipher::new("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG").unwrap();
        let msg = c.decrypt_for(encrypt, "wx2c2769f8efd9abc2").unwrap();
        let want = "<xml><ToUserName><![CDATA[gh_10f6c3c3ac5a]]></ToUserName>\n<FromUserName><![CDATA[oyORnuP8q7ou2gfYjqLzSIWZf0rs]]></FromUserName>\n<CreateTime>1409735668</CreateTime>\n<MsgType><![CDATA[text]]></MsgType>\n<Content><![CDATA[abcdteT]]></Content>\n<MsgId>6054768590064713728</MsgId>\n</xml>";
        assert_eq!(String::from_utf8(msg).unwrap(), want);
    }

    #[test]
    fn vector_c_wechatpy() {
        let c = Cipher::new("kWxPEV2UEDyxWpmPdKC3F4dgPDmOvfKX1HGnEUDS1aR").unwrap();
        let encrypt = "RgqEoJj5A4EMYlLvWO1F86ioRjZfaex/gePD0gOXTxpsq5Yj4GNglrBb8I2BAJVODGajiFnXBu7mCPatfjsu6IHCrsTyeDXzF6Bv283dGymzxh6ydJRvZsryDyZbLTE7rhnus50qGPMfp2wASFlzEgMW9z1ef/RD8XzaFYgm7iTdaXpXaG4+BiYyolBug/gYNx410cvkKR2/nPwBiT+P4hIiOAQqGp/TywZBtDh1yCF2KOd0gpiMZ5jSw3e29mTvmUHzkVQiMS6td7vXUaWOMZnYZlF3So2SjHnwh4jYFxdgpkHHqIrH/54SNdshoQgWYEvccTKe7FS709/5t6NMxuGhcUGAPOQipvWTT4dShyqio7mlsl5noTrb++x6En749zCpQVhDpbV6GDnTbcX2e8K9QaNWHp91eBdCRxthuL0=";
        assert_eq!(
            msg_signature("123456", "1411525903", "461056294", encrypt),
            "74d92dfeb87ba7c714f89d98870ae5eb62dff26d"
        );
        let msg = String::from_utf8(c.decrypt_for(encrypt, "wx49f0ab532d5d035a").unwrap()).unwrap();
        assert!(msg.contains("<Content><![CDATA[test]]></Content>"), "{msg}");
        assert!(msg.contains("messense"), "{msg}");

        let reply = "<xml>\n<MsgType><![CDATA[text]]></MsgType>\n<Content><![CDATA[test]]></Content>\n<FromUserName><![CDATA[wx49f0ab532d5d035a]]></FromUserName>\n<ToUserName><![CDATA[messense]]></ToUserName>\n<AgentID>1</AgentID>\n<CreateTime>1411525903</CreateTime>\n</xml>";
        let enc = c.encrypt(b"1234567890123456", reply.as_bytes(), "wx49f0ab532d5d035a");
        assert_eq!(
            enc,
            "9s4gMv99m88kKTh/H8IdkOiMg6bisoy3ypwy9H4hvSPe9nsGaqyw5hhSjdYbcrKk+j3nba4HMOTzHrluLBYqxgNcBqGsL8GqxlhZgURnAtObvesEl5nZ+uBE8bviY0LWke8Zy9V/QYKxNV2FqllNXcfmstttyIkMKCCmVbCFM2JTF5wY0nFhHZSjPUL2Q1qvSUCUld+/WIXrx0oyKQmpB6o8NRrrNrsDf03oxI1p9FxUgMnwKKZeOA/uu+2IEvEBtb7muXsVbwbgX05UPPJvFurDXafG0RQyPR+mf1nDnAtQmmNOuiR5MIkdQ39xn1vWwi1O5oazPoQJz0nTYjxxEE8kv3kFxtAGVRe3ypD3WeK2XeFYFMNMpatF9XiKzHo3"
        );
        assert_eq!(
            msg_signature("123456", "1411525903", "461056294", &enc),
            "407518b7649e86ef23978113f92d27afa9296533"
        );
    }

    #[test]
    fn bad_keys_and_ciphertexts_are_errors() {
        assert_eq!(Cipher::new("short").unwrap_err(), CryptoError::BadKey);
        assert_eq!(Cipher::new(&"+".repeat(43)).unwrap_err(), CryptoError::BadKey);
        let c = Cipher::new(&"A".repeat(43)).unwrap();
        assert_eq!(c.decrypt("!!!").unwrap_err(), CryptoError::NotBase64);
        assert_eq!(c.decrypt("AAAA").unwrap_err(), CryptoError::BadLength);
        let other = Cipher::new("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG").unwrap();
        assert!(other.decrypt(VECTOR_A_ENCRYPT).is_err());
        assert_eq!(format!("{c:?}"), "Cipher([REDACTED])");
    }

    proptest::proptest! {
        #[test]
        fn encrypt_then_decrypt_round_trips(msg in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
                                           appid in "wx[0-9a-f]{16}", random in proptest::array::uniform16(proptest::num::u8::ANY)) {
            let c = Cipher::new("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG").unwrap();
            let enc = c.encrypt(&random, &msg, &appid);
            proptest::prop_assert_eq!(c.decrypt_for(&enc, &appid).unwrap(), msg);
        }

        #[test]
        fn no_input_panics_the_decryptor(s in ".{0,400}", bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let c = Cipher::new("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG").unwrap();
            let _ = c.decrypt(&s);
            let _ = c.decrypt(&STANDARD.encode(&bytes));
        }
    }
}
