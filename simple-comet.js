/*
 * simple-comet.js - browser client for the Simple Comet server.
 *
 *   SimpleComet.subscribe(url, callback[, client_id[, onerror]]);
 *   SimpleComet.start();
 *
 * `url` is a channel URL ending in .jsonp, for example
 * "http://example.com:4080/channels/news%7Csport.jsonp", or a function that
 * returns one, called before each poll: a page whose URL carries a signed
 * token (?token=...) hands out a fresh one there. The two calls can
 * come in either order: subscriptions made before start() wait for it, those
 * made after it begin at once. Each subscription keeps its own long poll.
 *
 * callback(reply) is called for every successful reply, as in the original
 * client. reply.messages maps each channel to its new messages, oldest
 * first, each {id, ts, content}; a reply that ends a quiet poll has only
 * empty lists. reply.lost, when present, names the channels whose history
 * dropped messages before they could be read.
 *
 * onerror(what), if given, is called for each failed poll, with the reply
 * (negative return_code), the script's error event, or nothing (time-out).
 *
 * The client follows each reply's last_id, so no message comes twice and
 * none is skipped. A poll that fails is sent again after a delay that starts
 * at SimpleComet.backoff and doubles on each further failure, up to a
 * minute; a success resets it. A poll with no answer after
 * SimpleComet.timeout is given up (the server answers a held poll after 25
 * seconds by default). Both are in milliseconds and can be changed.
 *
 * It uses JSON-P (script tags), so it needs no CORS and runs in old browsers.
 * Each poll has a callback of its own, _JSONP_SimpleComet.r<number>; a reply
 * to a poll that was given up is ignored, and every script tag is removed
 * when its poll ends.
 */
var SimpleComet = (function () {
  var started = 0,
    queue = [],                    // subscriptions waiting for start()
    seq = +new Date,               // poll counter; starting at the clock keeps
                                   // URLs unique across page loads
    polls = window._JSONP_SimpleComet = {}, // callback of each poll in flight
    api = {
      timeout: 35e3,
      backoff: 1e3,

      subscribe: function (url, callback, client_id, onerror) {
        var since = 0, delay = 0,
          extra = (client_id ? 'client_id=' + encodeURIComponent(client_id) +
            '&' : '') + 'cb=_JSONP_SimpleComet.';

        // Sends the next poll after `wait` milliseconds.
        function poll(wait) {
          setTimeout(function () {
            var key = 'r' + seq++,
              href = url.call ? url() : url,   // a function: asked each time
              el = document.createElement('script'),
              timer = setTimeout(done, api.timeout);

            // Ends the poll: called with the reply, with the script's error
            // event, or with nothing when the time is up. Only the first
            // call counts.
            function done(reply) {
              if (el) {
                clearTimeout(timer);
                el.parentNode.removeChild(el);
                el = 0;
                // A poll that timed out keeps its (now inert) callback, in
                // case its reply still arrives.
                if (reply) delete polls[key];
                if (reply && reply.return_code > 0) {
                  since = reply.last_id;
                  poll(delay = 0);
                  callback(reply);
                } else {
                  poll(delay = Math.min(delay * 2 || api.backoff, 6e4));
                  if (onerror) onerror(reply);
                }
              }
            }

            polls[key] = el.onerror = done;
            el.src = href + (/\?/.test(href) ? '&' : '?') + extra + key +
              '&since=' + since;
            document.documentElement.appendChild(el);
          }, wait);
        }

        if (started) poll(0); else queue.push(poll);
      },

      start: function () {
        started = 1;
        while (queue.length) queue.shift()(0);
      }
    };
  return api;
})();
