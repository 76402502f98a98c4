//! wxpush-webhook: the URL WeChat pushes events to.
