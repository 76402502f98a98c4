//! WeChat push signatures and safe-mode (AES) encryption.
