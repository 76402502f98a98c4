//! wxpush-sandbox: a local stand-in for api.weixin.qq.com.
