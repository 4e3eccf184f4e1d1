package org.iterreduce.interop;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.io.BufferedReader;
import java.io.ByteArrayOutputStream;
import java.io.File;
import java.io.InputStreamReader;
import java.net.URI;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import org.apache.avro.AvroRemoteException;
import org.apache.avro.AvroRuntimeException;
import org.apache.avro.Protocol;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericDatumReader;
import org.apache.avro.generic.GenericDatumWriter;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.io.DecoderFactory;
import org.apache.avro.io.EncoderFactory;
import org.apache.avro.io.JsonEncoder;
import org.apache.avro.ipc.HttpTransceiver;
import org.apache.avro.ipc.RPCContext;
import org.apache.avro.ipc.RPCPlugin;
import org.apache.avro.ipc.generic.GenericRequestor;

/**
 * Calls an iterreduce master with Avro's own GenericRequestor over HttpTransceiver, the
 * protocol parsed from iterreduce/protocol.avpr; the job token goes into the call metadata
 * under {@code iterreduce-token} through an RPCPlugin.
 *
 * <pre>java org.iterreduce.interop.CallMaster PROTOCOL.avpr MASTER_URL &lt; CALLS</pre>
 *
 * Standard input: the job token on the first line, then one call a line, as JSON:
 * {@code {"message": "push", "token": true, "request": {...}}}, where {@code request} is the
 * message's request record in Avro's JSON encoding and {@code token} is {@code true} (the job
 * token), a string (sent as the token instead) or absent/false (no token in the metadata).
 * Prints one JSON line per call: {@code {"message": ..., "response": ...}} (Avro JSON), or
 * {@code {"message": ..., "error_type": ..., "error": ...}} for a declared error, or
 * {@code {"message": ..., "system_error": ...}} for Avro's system error.
 */
public final class CallMaster {
  private CallMaster() {}

  static final String TOKEN_KEY = "iterreduce-token";

  /** Puts the token (when there is one) into each call's metadata. */
  static final class TokenPlugin extends RPCPlugin {
    byte[] token;

    @Override
    public void clientSendRequest(RPCContext context) {
      if (token != null) {
        context.requestCallMeta().put(TOKEN_KEY, ByteBuffer.wrap(token));
      }
    }
  }

  public static void main(String[] args) throws Exception {
    if (args.length != 2) {
      System.err.println("usage: CallMaster PROTOCOL.avpr MASTER_URL < CALLS");
      System.exit(64);
    }
    Protocol protocol = Protocol.parse(new File(args[0]));
    BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
    String jobToken = in.readLine();
    if (jobToken == null) {
      System.err.println("CallMaster: no token on standard input");
      System.exit(64);
    }
    TokenPlugin plugin = new TokenPlugin();
    HttpTransceiver transceiver = new HttpTransceiver(URI.create(args[1]).toURL());
    transceiver.setTimeout(30_000);
    GenericRequestor requestor = new GenericRequestor(protocol, transceiver);
    requestor.addRPCPlugin(plugin);
    ObjectMapper json = new ObjectMapper();
    for (String line; (line = in.readLine()) != null; ) {
      if (line.isBlank()) {
        continue;
      }
      JsonNode call = json.readTree(line);
      String name = call.path("message").asText();
      Protocol.Message message = protocol.getMessages().get(name);
      if (message == null) {
        throw new IllegalArgumentException("no message " + name + " in " + protocol.getName());
      }
      JsonNode token = call.path("token");
      plugin.token = token.isTextual() ? token.asText().getBytes(StandardCharsets.UTF_8)
          : token.asBoolean(false) ? jobToken.getBytes(StandardCharsets.UTF_8) : null;
      Schema requestSchema = message.getRequest();
      Object request = new GenericDatumReader<>(requestSchema).read(null,
          DecoderFactory.get().jsonDecoder(requestSchema, json.writeValueAsString(call.path("request"))));
      ObjectNode result = json.createObjectNode().put("message", name);
      try {
        Object response = requestor.request(name, request);
        result.set("response", json.readTree(avroJson(message.getResponse(), response)));
      } catch (AvroRemoteException e) {
        Object value = e.getValue();
        if (value instanceof GenericRecord error) {
          result.put("error_type", error.getSchema().getFullName());
          result.set("error", json.readTree(avroJson(error.getSchema(), error)));
        } else {
          result.put("system_error", String.valueOf(value));
        }
      } catch (AvroRuntimeException e) {
        result.put("system_error", e.getMessage());
      }
      System.out.println(json.writeValueAsString(result));
      System.out.flush();
    }
  }

  static String avroJson(Schema schema, Object datum) throws java.io.IOException {
    ByteArrayOutputStream bytes = new ByteArrayOutputStream();
    JsonEncoder encoder = EncoderFactory.get().jsonEncoder(schema, bytes);
    new GenericDatumWriter<>(schema).write(datum, encoder);
    encoder.flush();
    return bytes.toString(StandardCharsets.UTF_8);
  }
}
